"""dalle2.clip"""
