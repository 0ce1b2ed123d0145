"""A pass in fxpasses' own convention, loaded through the ``fxpasses.passes`` entry point."""
from fxpasses import PassResult


def census(gm, ctx):
    """Changes nothing; notes how many calls the graph has after the patterns (the report shows it)."""
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    return PassResult(notes=[f"example plugin: {calls} calls after the patterns"])
