"""Model engines behind one interface (``Engine``) and the deployment that serves them."""
