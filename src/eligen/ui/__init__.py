"""`eligen ui`: a local web app to draw entities, generate and inpaint (a stdlib HTTP server and one page)."""
