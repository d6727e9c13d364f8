"""Compressors behind one protocol (models/protocol.py): LMs from local weights, classical codecs."""
