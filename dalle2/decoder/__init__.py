"""dalle2.decoder"""
