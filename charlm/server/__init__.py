"""The HTTP layer of `charlm serve`: the Starlette app and its routes (app.py), the batching engine that
advances every request's rows together (engine.py), and the page served at / (page.py). The only code that
imports starlette or uvicorn.
"""
