"""npeff_lens's Triton kernels, installed as ``npeff_lens.triton_kernels``.

The repository folder is called ``triton_kernels`` (the project layout), but the package is installed
under ``npeff_lens`` so it can never shadow, or be shadowed by, OpenAI's separate ``triton_kernels``
package. Import it as ``npeff_lens.triton_kernels``; nothing in npeff_lens imports a top-level
``triton_kernels``.
"""

IS_NPEFF_LENS_KERNELS = True
