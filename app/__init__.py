"""The share-diffusers web UI (``python app/app.py``): `studio` is the engine, `jobs` the learn jobs, `app` the Gradio UI."""
