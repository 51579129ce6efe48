"""`cshare demo`: the whole workflow end to end on a built-in image.

image (the demo image, built into a private podman store) and workflow
(make-shared, users mounting it, a container run, the report).  The top
layer, beside cli: it drives everything below and nothing imports it but
the `demo` command.
"""
