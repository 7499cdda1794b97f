"""The registry's routes: the Quart-Trio app, the plans it answers with, and how they reach clients.

Owns: authentication and admission of requests, classification of a request into a plan, the
responses (local blobs, in-flight blobs, manifests, mirrored bodies, errors), request metrics and
the access log, and the server that runs the app.
May import: every other package of `registry`.
"""
