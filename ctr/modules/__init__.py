"""Blocks shared by the models: MLP, Dice, target-attention variants, AUGRU, SimTier, GSU strategies."""
