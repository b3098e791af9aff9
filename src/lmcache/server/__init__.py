"""The cache server: request handlers, lookup sessions, metrics and the process runtime."""
