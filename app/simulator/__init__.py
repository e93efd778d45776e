"""A simulated vLLM engine: OpenAI-compatible API and vLLM metrics, with settable behaviour.

Lets the gateway be developed, tested and benchmarked without a GPU. Public surface:
`SimulatorConfig`, `create_app(config)` (ASGI) and `cli.main(argv)`.
"""

from app.simulator.config import SimulatorConfig
from app.simulator.server import create_app

__all__ = ["SimulatorConfig", "create_app"]
