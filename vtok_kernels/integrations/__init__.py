"""Integrations of VTok with other libraries, each an optional extra.

``vtok_kernels.integrations.transformers``: :func:`apply_vtok` puts VTok into a Hugging Face
video-language model (``pip install vtok_kernels[transformers]``). Nothing is imported here:
``import vtok_kernels`` never needs transformers.
"""
