"""The 3D KL autoencoder and the conditional 3D U-Net."""
