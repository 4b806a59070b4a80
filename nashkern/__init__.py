"""nashkern"""
