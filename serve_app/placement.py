"""One adapter for a component wherever it runs: inside this Gateway replica, or behind a handle.

``embedded`` components are plain objects called in process (no hop; they scale
with the Gateway and talk to Redis directly); ``deployment`` components are Serve
deployments reached through a handle (scaled on their own). The Gateway calls
both the same way, so moving a component is one line of serve_config.yaml.
"""

from __future__ import annotations

from typing import Any

from serve_app.constants import COMPONENT_CALL_TIMEOUT_S
from serve_app.handles import call


class Placed:
    """Calls a component's async methods in process or through its Serve handle.

    Args:
        name: the component, for error messages.
        target: the component object, or its ``DeploymentHandle``.
        remote: whether ``target`` is a handle.
        timeout_s: bound on a remote call.
    """

    def __init__(self, name: str, target: Any, *, remote: bool, timeout_s: float = COMPONENT_CALL_TIMEOUT_S) -> None:
        self.name = name
        self.target = target
        self.remote = remote
        self.timeout_s = timeout_s

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` with the arguments; the same result and errors either way."""
        if self.remote:
            return await call(getattr(self.target, method).remote(*args, **kwargs), self.timeout_s, self.name)
        return await getattr(self.target, method)(*args, **kwargs)

    async def close(self) -> None:
        """Release an embedded component's connections (a deployment closes its own)."""
        if not self.remote and hasattr(self.target, "close"):
            await self.target.close()
