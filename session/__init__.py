"""The session layer every front end shares (the CLI, the web page, the API server): options as
data, limits on what a request may make the model do, media loading under those limits, a
conversation's state, and opening the model. It sits between the front ends and the engine
(minicpmv.runtime) and knows nothing of any front end (docs/architecture.md §1)."""
