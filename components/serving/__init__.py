"""What a deployment installs, torch-free: the bundle's layout, check and `Predictor`
(`bundle`), `still predict --input` (`predict`) and a Triton model repository
(`triton_repo`)."""
