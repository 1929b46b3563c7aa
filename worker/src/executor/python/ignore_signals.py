# Leaves SIGINT and SIGTERM to the worker, which stops an executor by closing its connection.
import signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
