"""The teacher server: an HTTP service that scores sequences with a teacher and returns log-probs."""
