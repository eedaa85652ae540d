"""Teachers: a local model beside the student (and, later, a server client and its payload codec)."""
