"""DECA's loss terms, one module per family; ``total`` wires them with the config weights."""
