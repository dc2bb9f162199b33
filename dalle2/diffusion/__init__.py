"""dalle2.diffusion"""
