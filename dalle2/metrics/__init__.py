"""dalle2.metrics"""
