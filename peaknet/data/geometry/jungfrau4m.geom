; Jungfrau 4M, nominal metrology written for peaknet.
; 8 modules of 512 x 1024 (75 um pixels) in a slab of 4096 x 1024 (module m at ss = 512 m),
; 2 columns x 4 rows: m0-m3 left column top to bottom, m4-m7 right column. 3 mm between
; the columns and around the centre, 2.7 mm between other rows; the beam passes the
; central hole 3.5, -2.5 pixels off its centre. clen 0.12 m, 12.4 keV.

photon_energy = 12400 eV
clen = 0.120 m
res = 13333.333333
adu_per_photon = 1
data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
peak_list = /entry_1/result_1
peak_list_type = cxi

rigid_group_left = m0,m1,m2,m3
rigid_group_right = m4,m5,m6,m7
rigid_group_collection_halves = left,right

m0/min_fs = 0
m0/max_fs = 1023
m0/min_ss = 0
m0/max_ss = 511
m0/fs = +1.000000x +0.000524y
m0/ss = +0.000524x -1.000000y
m0/corner_x = -1040.500
m0/corner_y = 1077.500

m1/min_fs = 0
m1/max_fs = 1023
m1/min_ss = 512
m1/max_ss = 1023
m1/fs = +1.000000x -0.000349y
m1/ss = -0.000349x -1.000000y
m1/corner_x = -1040.500
m1/corner_y = 529.500

m2/min_fs = 0
m2/max_fs = 1023
m2/min_ss = 1024
m2/max_ss = 1535
m2/fs = +1.000000x +0.000698y
m2/ss = +0.000698x -1.000000y
m2/corner_x = -1040.500
m2/corner_y = -22.500

m3/min_fs = 0
m3/max_fs = 1023
m3/min_ss = 1536
m3/max_ss = 2047
m3/fs = +1.000000x -0.000873y
m3/ss = -0.000873x -1.000000y
m3/corner_x = -1040.500
m3/corner_y = -570.500

m4/min_fs = 0
m4/max_fs = 1023
m4/min_ss = 2048
m4/max_ss = 2559
m4/fs = +1.000000x +0.000349y
m4/ss = +0.000349x -1.000000y
m4/corner_x = 23.500
m4/corner_y = 1077.500

m5/min_fs = 0
m5/max_fs = 1023
m5/min_ss = 2560
m5/max_ss = 3071
m5/fs = +1.000000x -0.000524y
m5/ss = -0.000524x -1.000000y
m5/corner_x = 23.500
m5/corner_y = 529.500

m6/min_fs = 0
m6/max_fs = 1023
m6/min_ss = 3072
m6/max_ss = 3583
m6/fs = +1.000000x +0.000873y
m6/ss = +0.000873x -1.000000y
m6/corner_x = 23.500
m6/corner_y = -22.500

m7/min_fs = 0
m7/max_fs = 1023
m7/min_ss = 3584
m7/max_ss = 4095
m7/fs = +1.000000x -0.000175y
m7/ss = -0.000175x -1.000000y
m7/corner_x = 23.500
m7/corner_y = -570.500
