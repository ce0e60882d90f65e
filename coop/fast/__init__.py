"""Speed machinery behind the ``FAST`` config node, kept apart from the methods.

Every path here gives the plain computation's numbers up to float rounding, and
``FAST.ENABLED False`` computes exactly what the original code computes.
"""
