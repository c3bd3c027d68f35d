"""What every job runs on: the backend chosen at a command's start (`backend.py`), joining the
processes of a multi-host job (`distributed.py`), the device mesh and every sharding
(`mesh.py`), files a kill cannot tear (`files.py`), checkpoints (`checkpoint.py`), the one
command line (`cli.py`) and the user-error type (`errors.py`)."""
