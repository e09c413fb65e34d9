"""Points pika's default port at the broker under test, so unchanged programs reach it.

Python imports this module at startup when its directory is on PYTHONPATH, as
tests/src/python.rs arranges. It acts only when PETREL_AMQP_PORT is set:

* pika's default port (``Parameters.DEFAULT_PORT``, read by every ``ConnectionParameters``
  made without a port) becomes that port;
* the host ``localhost`` becomes ``127.0.0.1``, where the broker under test listens:
  ``localhost`` may resolve to ``::1`` first, where another process could hold the port.
"""

import os

_port = os.environ.get("PETREL_AMQP_PORT")

if _port:
    import pika.connection

    _parameters = pika.connection.Parameters
    _parameters.DEFAULT_PORT = int(_port)
    _host = _parameters.host

    def _set_host(self, value):
        _host.fset(self, "127.0.0.1" if value == "localhost" else value)

    _parameters.host = _host.setter(_set_host)
