"""The HTTP frontend (FastAPI), served beside the ZMQ endpoint in the same process."""
