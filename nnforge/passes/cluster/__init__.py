"""Weight clustering / palettisation: k-means per tensor or per group of output channels, with
k-means++ initialisation and Hessian-weighted (sensitivity-aware) clustering."""
