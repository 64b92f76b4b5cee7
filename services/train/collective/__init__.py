"""The training collective: who takes part in an outer step, how the data moves, how a rank catches up.

``agreement`` (the per-step decision), ``exchange`` (shards, chunks, fixed-order reduction),
``tensors`` (tensors as checked chunk frames), ``state`` (snapshot transfer for rejoins) and
``group`` (one rank's membership, tying them to a :class:`bus.peers.PeerLink`). The transport stays
in ``bus/``; nothing there knows about training.
"""
