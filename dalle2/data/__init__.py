"""dalle2.data"""
