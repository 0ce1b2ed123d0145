"""An example fxpasses plugin: GPT-2's hand-written GELU as a pattern, and a pass that counts the graph's ops."""
