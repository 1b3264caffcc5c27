"""The file that marks each kind of directory malmen writes.

A writer creates its directory atomically with this file as the marker (``io.atomic_dir``); readers
recognise the directory by it, and commands refuse to replace a directory without it
(``io.check_replaceable``). No torch here: the command line checks paths before loading anything.
An editor's weights have one name too, read and written in several places.
"""
EDITOR_FILE = "editor.json"   # a meta-trained editor: editor.py, export.py
EDITOR_WEIGHTS = "editor.safetensors"  # its hyper-network, beside EDITOR_FILE: editor.py, export.py, train.py
EDITOR_PRIOR = "prior.safetensors"     # its regulariser's shape where it keeps one (editor.keep_prior)
PATCH_FILE = "patch.json"     # a patch of edited weights: patches.py
MODEL_FILE = "config.json"    # a saved model (Hugging Face's own marker): models.py
HEAD_FILE = "head.json"       # a classifier head: classifier.py
