"""Modules: MSQ training layers, activation quantizers and packed (exported) inference layers."""
