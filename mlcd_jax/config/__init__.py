"""Every config's fields, types, defaults and allowed values, declared once (`schema.py`), the
paper's recipes (`recipes.py`) and the presets that ship with the package, by name (`presets/`)."""
