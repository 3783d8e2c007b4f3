"""Integrations with other libraries (imported on demand): :mod:`moerust.integrations.transformers`."""
