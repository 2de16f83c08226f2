"""Process mesh, collectives, the data-parallel engine and `parallelize()`."""
from .config import ParallelConfig
from .engine import Engine
from .mesh import Mesh
from .parallelize import parallelize

__all__ = ["ParallelConfig", "Mesh", "Engine", "parallelize"]
