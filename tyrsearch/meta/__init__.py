"""Meta-pruning with graph metanetworks (Liu et al., "Meta Pruning via Graph Metanetworks"): a GNN
rewrites a network's weights so that it becomes easy to prune, then the network is pruned structurally
and fine-tuned. For vision networks trained here on Fashion-MNIST (ResNet-style CNNs and small ViTs).

    data     Fashion-MNIST tensors from the Debian package dataset-fashion-mnist
    nets     the two families, their configs (every prunable width) and FLOPs
    zoo      training, saving / loading networks, the zoo the metanetwork learns from
    graph    network <-> graph, exact both ways
    groups   the structural groups (channels, heads) and their coupled slices
    gnn      the metanetwork (torch_geometric MessagePassing)
    train    meta-training with functional_call and a group-lasso regulariser, resumable
    prune    group-L2 / random pruning to a FLOPs speedup, and the meta-pruning pipeline
"""
