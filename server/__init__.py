"""batchwire's server: datasets, samplers, a worker pool, and the gRPC service over them.

Start one with ``batchwire serve --config FILE`` or, in Python::

    server = BatchwireServer(load_config("digits.toml"), port=0)
    server.start()
    print(server.port)
"""

from batchwire.server.app import BatchwireServer
from batchwire.server.config import Config, ConfigError, load_config

__all__ = ["BatchwireServer", "Config", "ConfigError", "load_config"]
