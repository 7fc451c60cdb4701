"""Weight clustering / palettisation: k-means per tensor or per group of output channels, with
k-means++ initialisation and Hessian-weighted (sensitivity-aware) clustering."""
from .kmeans import Palettize, kmeans_1d, palettize_weight

__all__ = ["Palettize", "kmeans_1d", "palettize_weight"]
