"""Fine-tuning: datasets built from the ledger, trained LoRA adapters and their registry."""
