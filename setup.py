from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


if __name__ == "__main__":
    setup(
        name="deberta_ds",
        version="0.1.0",
        description="DeBERTaV3 pre-training (RTD + GDES) on DeepSpeed",
        long_description=(HERE / "README.md").read_text(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        # The DeepSpeed configurations live (and are edited) in the top-level ds_configs/; a wheel carries
        # them as deberta_ds/ds_configs/, where deberta_ds/resources.py reads them through importlib.resources.
        packages=[*find_packages(include=["deberta_ds", "deberta_ds.*", "data_prep", "data_prep.*"]),
                  "deberta_ds.ds_configs"],
        package_dir={"deberta_ds.ds_configs": "ds_configs"},
        package_data={"deberta_ds": ["recipes/*.yaml", "recipes/*/*.yaml"], "deberta_ds.ds_configs": ["*.json"]},
        install_requires=requirements(),
        extras_require={
            # Oracles for the tests: HF DebertaV2 (model parity) and megatron-core (shard layout). No triton
            # pin: the tests take the Triton torch brings (a CUDA torch pins its own; CPU torch brings none,
            # launch_scripts/install.sh adds one for the interpreter), and the compile test installs the
            # compilers it gates into their own cached folders (deberta_ds/kernels/compile_check.py).
            "test": ["pytest>=8", "transformers==5.23.0", "megatron-core==0.16.1", "safetensors>=0.4",
                     "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2", "ruff==0.17.6",
                     "scikit-learn==1.9.1", "scipy==1.17.1", "seqeval==1.2.2"],
            # Optional features (deberta_ds/extras.py names the extra when one is missing):
            # fine-tuning and downstream evaluation with transformers and the metric libraries
            # (deberta_ds.finetune, deberta_ds.evaluate); ONNX export (convert to-onnx), onnxruntime runs it.
            "hf": ["transformers==5.23.0", "scikit-learn==1.9.1", "scipy==1.17.1", "seqeval==1.2.2"],
            "onnx": ["onnx>=1.16", "onnxruntime>=1.18"],
            # Fused attention kernels (GPU; CPU runs them under TRITON_INTERPRET=1 in the tests).
            "kernels": ["triton>=3.2"],
        },
        entry_points={"console_scripts": ["deberta-ds-convert=deberta_ds.convert:main",
                                          "data-prep=data_prep.cli:main"]},
    )
