"""dalle2.lit"""
