"""The PyQt6 reviewer: worklist, side-by-side views with window/level, the indication and
the editable draft, and sign-off. Qt-free view-models hold the logic; the widgets are thin.
The only package that imports PyQt6.
"""
