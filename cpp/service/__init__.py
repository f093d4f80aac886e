"""The cpp job service: a FastAPI app over the same library calls and result schema as ``cpp cluster``."""
