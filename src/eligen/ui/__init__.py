"""`eligen ui`: a local web app to draw entities, generate and inpaint (Starlette on uvicorn, the ``ui`` extra, and
one page)."""
