"""dalle2.prior"""
