"""`triforce serve`: an OpenAI-compatible HTTP server with the engine underneath.

app.py: the routes, authentication, Server-Sent Events; openai.py: OpenAI requests and
responses to and from the engine's terms; worker.py: the queue and the worker that decodes
admitted requests together.
"""
