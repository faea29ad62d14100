"""C++ and CUDA sources of minaction, shipped as package data and compiled on first use."""
