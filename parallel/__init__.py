"""Process mesh, parallel configuration and `parallelize()`."""
from .config import ParallelConfig
from .mesh import Mesh
from .parallelize import parallelize, unwrap

__all__ = ["ParallelConfig", "Mesh", "parallelize", "unwrap"]
