"""The demo: procedural chest CT phantoms (`ctld.demo.phantom`) and `ctld-demo` / `make demo` (`ctld.demo.cli`),
the whole chain on a machine without hospital data or a GPU. Not imported by the training or inference code."""
