# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
`python -m visiontrim.convert_checkpoint`, the older name of `visiontrim-convert`: the converter lives in
`tools/convert/`, and its public names are re-exported here.
"""

from visiontrim.tools.convert import ConversionError, convert, main, parse_arguments


__all__ = ["ConversionError", "convert", "main", "parse_arguments"]

if __name__ == "__main__":
    main()
