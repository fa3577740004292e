"""The platform: tunelab as a shared server (docs/platform.md).

    tunelab server                     # http://127.0.0.1:8000: OpenAI fine-tuning + chat, Bedrock, native recipes

- ``store``: jobs, files, keys and the audit log in the workspace catalog (tunelab.db)
- ``auth``: API keys (shown once, stored as scrypt hashes), roles, projects
- ``jobs``: an API request → a tunelab recipe and the CLI command that runs it
- ``worker`` / ``executors``: take jobs by lease with a heartbeat; run each as a subprocess of
  the real CLI, locally or through Ray Jobs
- ``app``: the FastAPI app (OpenAI, Bedrock and native routes); ``inference``: chat with a
  finished job's model through tunelab.serve
"""
